#!/usr/bin/env python3
"""A dso test plugin that misbehaves on request.

config: {"mode": MODE, "starts_file": PATH, "bad_starts": N, "value": TEXT}
Each start appends a line to starts_file. While the number of starts is <= bad_starts
(default: always), `version` and `fetch` misbehave as MODE says:
  crash     exit(3) without answering
  hang      never answer
  garbage   answer a line that is not JSON
  wrong_id  answer with another id
  oversized answer a 3 MiB line
  child     start a grandchild (sleep 1000) that writes its pid to starts_file + ".child",
            then hang
Otherwise it answers version "1" and the value TEXT. `check` reports the environment,
argv and process group as JSON in "detail". Every request line is also echoed to stderr,
prefixed with "stderr-echo: ".
"""

import base64
import json
import os
import subprocess
import sys
import time


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    config = {}
    starts = 0
    for line in sys.stdin:
        req = json.loads(line)
        rid = req.get("id")
        method = req.get("method")
        if method == "hello":
            config = req.get("config") or {}
            with open(config["starts_file"], "a") as f:
                f.write("start\n")
            with open(config["starts_file"]) as f:
                starts = len(f.readlines())
            send({"id": rid, "ok": {"protocol": 1}})
            continue
        print("stderr-echo: " + line.strip(), file=sys.stderr, flush=True)
        if method == "check":
            detail = {
                "env": dict(os.environ),
                "argv": sys.argv[1:],
                "own_group": os.getpgid(0) == os.getpid(),
                "cwd": os.getcwd(),
            }
            send({"id": rid, "ok": {"detail": json.dumps(detail)}})
            continue
        bad = starts <= config.get("bad_starts", 1 << 30)
        mode = config.get("mode", "none") if bad else "none"
        if mode == "crash":
            sys.exit(3)
        if mode == "hang":
            time.sleep(1000)
        if mode == "garbage":
            sys.stdout.write("this is not json\n")
            sys.stdout.flush()
            continue
        if mode == "wrong_id":
            send({"id": rid + 1000, "ok": {"version": "1"}})
            continue
        if mode == "oversized":
            sys.stdout.write('{"id": %d, "ok": {"version": "' % rid + "a" * (3 << 20) + '"}}\n')
            sys.stdout.flush()
            continue
        if mode == "child":
            p = subprocess.Popen(["sleep", "1000"])
            with open(config["starts_file"] + ".child", "w") as f:
                f.write(str(p.pid))
            time.sleep(1000)
        if method == "version":
            send({"id": rid, "ok": {"version": "1"}})
        elif method == "fetch":
            value = config.get("value", "misbehave-default-value").encode()
            send({"id": rid, "ok": {"value": base64.b64encode(value).decode(), "version": "1"}})


if __name__ == "__main__":
    main()
