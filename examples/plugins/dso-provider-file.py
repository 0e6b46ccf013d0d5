#!/usr/bin/env python3
"""dso reference plugin: serves secrets from a JSON file.

Speaks dso plugin protocol 1 (docs/secrets.md, "Plugins"): one JSON object per line on
stdin (requests) and stdout (answers). Diagnostics go to stderr, which dso logs.

Its settings arrive in the first message (`hello`), under "config":
  {"file": "/etc/dso/plugin-secrets.json", "report_versions": true}

The secrets file is a JSON object from a name (the mapping's reference) to either
  {"value": "TEXT", "version": "7"}     an explicit version, or
  {"value": "TEXT"}  /  "TEXT"           version = hash of the entry (changes with it),
and "value_base64": "..." instead of "value" for binary values. With
"report_versions": false the plugin answers every version request with null, and dso falls
back to a digest of the value (each poll then reads the value).

Only the standard library is used; python3 >= 3.8.
"""

import base64
import hashlib
import json
import sys

PROTOCOL = 1


def log(msg):
    print(f"dso-provider-file: {msg}", file=sys.stderr, flush=True)


class Secrets:
    def __init__(self, config):
        if not isinstance(config, dict) or not isinstance(config.get("file"), str):
            raise ValueError('config needs "file": the path of the secrets JSON file')
        self.path = config["file"]
        self.report_versions = bool(config.get("report_versions", True))

    def load(self):
        # Read at every request: a changed file is seen at the next poll.
        with open(self.path, "rb") as f:
            doc = json.load(f)
        if not isinstance(doc, dict):
            raise ValueError(f"{self.path} is not a JSON object")
        return doc

    def entry(self, name):
        doc = self.load()
        if name not in doc:
            return None
        raw = doc[name]
        if isinstance(raw, str):
            raw = {"value": raw}
        if not isinstance(raw, dict):
            raise ValueError(f"entry {name!r} is neither a string nor an object")
        if "value_base64" in raw:
            value = base64.b64decode(raw["value_base64"], validate=True)
        else:
            value = str(raw.get("value", "")).encode()
        version = raw.get("version")
        if version is None:
            canon = json.dumps(raw, sort_keys=True).encode()
            version = "h" + hashlib.sha256(canon).hexdigest()[:32]
        return value, str(version)


def error(kind, message):
    return {"kind": kind, "message": message}


def handle(secrets, req):
    method = req.get("method")
    if method == "check":
        doc = secrets.load()
        return {"detail": f"file {secrets.path}: {len(doc)} entries"}, None
    ref = req.get("reference")
    if not isinstance(ref, str) or not ref:
        return None, error("invalid", "request without a reference")
    found = secrets.entry(ref)
    if found is None:
        return None, error("not_found", f"no entry {ref!r}")
    value, version = found
    if method == "version":
        return {"version": version if secrets.report_versions else None}, None
    if method == "fetch":
        wanted = req.get("version")
        if wanted is not None and wanted != version:
            # Only the current version exists in a file.
            return None, error("not_found", f"version {wanted!r} of {ref!r} is gone")
        answer = {"value": base64.b64encode(value).decode()}
        if secrets.report_versions:
            answer["version"] = version
        return answer, None
    return None, error("invalid", f"unknown method {method!r}")


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    secrets = None
    for line in sys.stdin:
        try:
            req = json.loads(line)
        except ValueError:
            log("ignoring a request line that is not JSON")
            continue
        rid = req.get("id")
        if req.get("method") == "hello":
            if req.get("protocol") != PROTOCOL:
                send({"id": rid, "error": error("invalid", f"this plugin speaks protocol {PROTOCOL}")})
                continue
            try:
                secrets = Secrets(req.get("config"))
            except ValueError as e:
                send({"id": rid, "error": error("invalid", str(e))})
                continue
            log(f"serving {secrets.path}")
            send({"id": rid, "ok": {"protocol": PROTOCOL, "name": "dso-provider-file"}})
            continue
        if secrets is None:
            send({"id": rid, "error": error("invalid", "hello first")})
            continue
        try:
            ok, err = handle(secrets, req)
        except (OSError, ValueError) as e:
            ok, err = None, error("unavailable", f"{type(e).__name__}: {e}")
        send({"id": rid, "ok": ok} if err is None else {"id": rid, "error": err})


if __name__ == "__main__":
    main()
