// compose-check loads a Compose file with the loader Docker Compose itself uses
// (github.com/compose-spec/compose-go/v2) and prints the resolved project as JSON, so that the
// deploy tests check what `docker compose` would run, not what a hand-written parser thinks.
//
//	compose-check [--env-file FILE] COMPOSE_FILE
//
// Interpolation reads only the given env file (never the caller's environment): a variable the
// file requires and the env file does not set is an error, as it is for `docker compose up`.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	envFile := flag.String("env-file", "", "the .env file to interpolate from (none: an empty environment)")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: compose-check [--env-file FILE] COMPOSE_FILE")
		os.Exit(2)
	}
	file, err := filepath.Abs(flag.Arg(0))
	if err != nil {
		fail(err)
	}
	opts := []cli.ProjectOptionsFn{
		cli.WithWorkingDirectory(filepath.Dir(file)),
		cli.WithName("mq-cutover"),
		cli.WithResolvedPaths(true),
		cli.WithInterpolation(true),
	}
	if *envFile != "" {
		opts = append(opts, cli.WithEnvFiles(*envFile), cli.WithDotEnv)
	}
	options, err := cli.NewProjectOptions([]string{file}, opts...)
	if err != nil {
		fail(err)
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		fail(err)
	}
	out, err := json.MarshalIndent(project, "", "  ")
	if err != nil {
		fail(err)
	}
	fmt.Println(string(out))
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "compose-check:", err)
	os.Exit(1)
}
