//! Reading one copy again by its position (adoption), and namespaces.

use super::*;

use mq_cutover::source::Position;

#[tokio::test]
async fn a_copy_is_read_again_by_position_and_an_offset_the_broker_lacks_is_none() {
    let t0 = Instant::now();
    let (topic, group) = fresh_topic("refetch", 2).await;
    let s = side(&topic, &group);
    let w = writer(&group).await;
    send_range(&w, &topic, 0..6).await;

    let mut src = start(&s, false);
    let got = src.take(6, ARRIVAL).await;
    let origins: Vec<_> = got.iter().map(|m| (id_of(m), m.origin.clone())).collect();
    let payloads: BTreeMap<String, Vec<u8>> =
        got.iter().map(|m| (id_of(m), m.payload.clone())).collect();
    // Acknowledged and committed, as adoption does with a copy whose owner never saw it.
    done(got);

    let mut times = Vec::new();
    for (id, origin) in &origins {
        let t = Instant::now();
        let again = src
            .refetch
            .refetch(&Position::of(origin))
            .await
            .unwrap_or_else(|e| panic!("refetch {origin:?}: {e}"))
            .unwrap_or_else(|| panic!("the broker still has {origin:?}"));
        times.push(t.elapsed());
        let identity = again.identity.expect("identity");
        assert_eq!(&identity.id, id, "{origin:?}");
        assert_eq!(identity.business_id, format!("u-{}", &id[2..]));
        assert_eq!(again.payload, payloads[id]);
        assert_eq!(again.born_ms, origin.born_ms);
    }

    // Past the end of a queue (never written) and below its start: nothing there.
    let origin = &origins[0].1;
    for offset in [1_000_000, -1] {
        let at = Position {
            offset,
            ..Position::of(origin)
        };
        assert!(
            src.refetch
                .refetch(&at)
                .await
                .expect("the broker answers")
                .is_none(),
            "{at:?}"
        );
    }
    // A broker the name server does not know: an error, to be tried again later.
    let unknown = Position {
        broker: Some("no-such-broker".into()),
        ..Position::of(origin)
    };
    assert!(src.refetch.refetch(&unknown).await.is_err());
    // A position still readable after that failure (the reader starts afresh).
    assert!(src
        .refetch
        .refetch(&Position::of(origin))
        .await
        .unwrap()
        .is_some());
    src.stop().await;

    // No name server at all: an error naming the side.
    let mut gone = s.clone();
    gone.rocketmq.as_mut().unwrap().name_server = format!("127.0.0.1:{}", common::free_port());
    let refetch = rocketmq::build(&gone).unwrap().refetcher().unwrap();
    let e = refetch
        .refetch(&Position::of(origin))
        .await
        .expect_err("no name server");
    assert!(e.to_string().starts_with("rocketmq: "), "{e}");
    w.shutdown().await;
    eprintln!(
        "refetch: {times:?} per copy (the first starts the reader), whole test {:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn a_namespace_puts_topic_and_group_under_it_on_the_broker() {
    let t0 = Instant::now();
    require_rocketmq();
    let tag = format!("{:08x}", rand::random::<u32>());
    let (ns, topic, group) = (
        format!("mqcns{tag}"),
        format!("mqc-t-ns-{tag}"),
        format!("mqc-g-ns-{tag}"),
    );
    // The broker knows the topic only by its namespaced name.
    create_topic("rocketmq", &format!("{ns}%{topic}"), 1).await;
    let mut cfg = RocketMqSideConfig::plain(&name_server(), &topic, &group);
    cfg.namespace = Some(ns.clone());
    let w = RocketMqWriter::connect_side(&cfg, &format!("{group}-producer"), None)
        .await
        .unwrap();
    send_range(&w, &topic, 0..5).await;

    let mut s = side(&topic, &group);
    s.rocketmq = Some(cfg);
    let mut src = start(&s, false);
    let got = src.take(5, ARRIVAL).await;
    for m in &got {
        assert_eq!(
            &*m.origin.topic, topic,
            "the origin names the topic as configured"
        );
    }
    // The lag is labelled with the topic as configured too.
    src.lags_become(
        &BTreeMap::from([(format!("broker-a/{topic}/0"), 5)]),
        Duration::from_secs(10),
    )
    .await;
    let origin = got[0].origin.clone();
    done(got);
    assert!(src
        .refetch
        .refetch(&Position::of(&origin))
        .await
        .unwrap()
        .is_some());
    src.stop().await;

    // A client without the namespace finds the messages under `namespace%topic`.
    let raw = side(&format!("{ns}%{topic}"), &format!("{group}-raw"));
    let mut plain = start(&raw, false);
    let ids: BTreeSet<String> = plain.take(5, ARRIVAL).await.iter().map(id_of).collect();
    assert_eq!(ids, (0..5).map(|n| format!("m-{n}")).collect());
    plain.stop().await;
    w.shutdown().await;
    eprintln!("namespace: whole test {:?}", t0.elapsed());
}
