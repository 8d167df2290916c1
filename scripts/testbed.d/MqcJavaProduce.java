// A tiny producer on the Apache RocketMQ Java client, for the RocketMQ source's codec tests:
// it compresses bodies the way Java producers really do (LZ4 in the frame format, zstd, zlib).
// Run by scripts/rocketmq-java-produce; not part of the daemon.
//
//   MqcJavaProduce NAMESRV TOPIC CODEC FROM TO PAD
//
// Sends, for every N in FROM..TO (TO excluded), the message whose user property `msg-id` and
// key are `m-N` and whose body is {"user_id":"u-N","pad":"<PAD characters>"}; CODEC is LZ4,
// ZSTD or ZLIB, and every body of at least 1,024 bytes is compressed with it.
import java.nio.charset.StandardCharsets;

import org.apache.rocketmq.client.producer.DefaultMQProducer;
import org.apache.rocketmq.client.producer.SendResult;
import org.apache.rocketmq.client.producer.SendStatus;
import org.apache.rocketmq.common.compression.CompressionType;
import org.apache.rocketmq.common.message.Message;

public class MqcJavaProduce {
    public static void main(String[] args) throws Exception {
        if (args.length != 6) {
            System.err.println("usage: MqcJavaProduce NAMESRV TOPIC CODEC FROM TO PAD");
            System.exit(2);
        }
        String topic = args[1];
        int from = Integer.parseInt(args[3]);
        int to = Integer.parseInt(args[4]);
        int pad = Integer.parseInt(args[5]);
        DefaultMQProducer producer = new DefaultMQProducer("mqc-java-" + System.nanoTime());
        producer.setNamesrvAddr(args[0]);
        producer.setCompressType(CompressionType.of(args[2]));
        producer.setCompressMsgBodyOverHowmuch(1024);
        producer.start();
        int sent = 0;
        try {
            for (int n = from; n < to; n++) {
                String id = "m-" + n;
                String body = "{\"user_id\":\"u-" + n + "\",\"pad\":\"" + padding(n, pad) + "\"}";
                Message m = new Message(topic, body.getBytes(StandardCharsets.UTF_8));
                m.putUserProperty("msg-id", id);
                m.setKeys(id);
                SendResult r = producer.send(m);
                if (r.getSendStatus() != SendStatus.SEND_OK) {
                    throw new IllegalStateException(id + ": " + r.getSendStatus());
                }
                sent++;
            }
        } finally {
            producer.shutdown();
        }
        System.out.println("sent " + sent);
    }

    /** The same padding as the Rust tests build: `len` characters cycling through the id. */
    static String padding(int n, int len) {
        String unit = "pad-" + n + "-";
        StringBuilder b = new StringBuilder(len);
        while (b.length() < len) {
            b.append(unit);
        }
        b.setLength(len);
        return b.toString();
    }
}
