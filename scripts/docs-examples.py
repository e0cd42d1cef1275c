#!/usr/bin/env python3
"""Runs the shell examples of README.md and docs/*.md against a live server.

Every ```sh or ```console block must be preceded by a declaration, an HTML comment
that says what the block needs:

    <!-- example: run -->                       run it; the server must be up
    <!-- example: run; server: K=V K=V -->       run it against a server started
                                                 with these variables
    <!-- example: not run: <why> -->             shown only (name who checks it)

The blocks of one file run in order in one bash session (a variable a block sets is
there for the next), started with a bare environment: PATH (with the built binaries
first) and HOME only, so an example must set whatever else it uses. In a ```console
block, each `$ ` line is a command (a line ending in `\\` continues it) and the lines
after it, up to the next command, are its expected output (standard output and
error, as a terminal shows them); a ```sh block's commands only have to succeed. A
command that exits non-zero fails the run (with pipefail: any part of a pipeline).

Expected output matches when each line matches: `…` stands for any text, a timestamp
for any timestamp, and a UUID for the id this run gave in its place, the same one
wherever the page shows that UUID; trailing blanks are ignored. `--update` writes
what the run printed into the files, keeping the lines that still match as shown.

The server is `boxoffice serve` on 127.0.0.1:3000 with its defaults (Redis and
PostgreSQL on their standard local ports, database `boxoffice`), as the README runs
it; the runner starts it, restarts it when a block declares other variables, and
stops it at the end. Port 3000 must be free.
"""

import argparse
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DECLARATION = re.compile(r"^<!--\s*example:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
LISTEN = "127.0.0.1:3000"
COMMAND_TIMEOUT_S = 180

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
TIMESTAMP = (
    r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d(?::?\d\d)?)?"
)
VOLATILE = re.compile(f"({UUID}|{TIMESTAMP}|…)")


class Failure(Exception):
    pass


class Block:
    def __init__(self, path, line, lang, declaration, body, start, end):
        self.path = path
        self.line = line  # 1-based line of the opening fence
        self.lang = lang
        self.declaration = declaration
        self.body = body  # lines between the fences
        self.start = start  # index of the first body line
        self.end = end  # index of the closing fence

    def where(self):
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks_of(path):
    lines = path.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(1):
            if m:  # an untagged fence: skip to its end
                i += 1
                while i < len(lines) and not lines[i].startswith("```"):
                    i += 1
            i += 1
            continue
        lang, open_at = m.group(1), i
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            i += 1
        if lang in ("sh", "console"):
            prev = lines[open_at - 1] if open_at > 0 else ""
            d = DECLARATION.match(prev)
            blocks.append(
                Block(path, open_at + 1, lang, d.group(1) if d else None,
                      lines[open_at + 1:i], open_at + 1, i)
            )
        i += 1
    return lines, blocks


def parse_declaration(block):
    """('run', {env}) or ('skip', reason); a missing or unknown one is a failure."""
    d = block.declaration
    if d is None:
        raise Failure(f"{block.where()}: a ```{block.lang} block without "
                      "<!-- example: run --> or <!-- example: not run: <why> -->")
    if d.startswith("not run:") and d[len("not run:"):].strip():
        return "skip", d[len("not run:"):].strip()
    if d == "run":
        return "run", {}
    if d.startswith("run;"):
        rest = d[len("run;"):].strip()
        if rest.startswith("server:"):
            env = {}
            for pair in shlex.split(rest[len("server:"):]):
                key, sep, value = pair.partition("=")
                if not sep:
                    raise Failure(f"{block.where()}: server variable {pair!r} is not K=V")
                env[key] = value
            return "run", env
    raise Failure(f"{block.where()}: cannot read the declaration {d!r}")


def commands_of(block):
    """[(command, expected output lines, index of the command's first line)]."""
    if block.lang == "sh":
        out, pending, first = [], [], None
        for n, line in enumerate(block.body):
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if not pending:
                first = n
            pending.append(line)
            if not line.rstrip().endswith("\\"):
                out.append(("\n".join(pending), None, first))
                pending = []
        return out
    out, n = [], 0
    while n < len(block.body):
        line = block.body[n]
        if not line.startswith("$ "):
            raise Failure(f"{block.where()}: line {n + 1} of the block is output "
                          "before any command")
        first, parts = n, [line[2:]]
        while parts[-1].rstrip().endswith("\\") and n + 1 < len(block.body):
            n += 1
            parts.append(block.body[n])
        n += 1
        expected = []
        while n < len(block.body) and not block.body[n].startswith("$ "):
            expected.append(block.body[n])
            n += 1
        out.append(("\n".join(parts), expected, first))
    return out


def pattern_of(expected_line):
    parts = []
    for piece in VOLATILE.split(expected_line.rstrip()):
        if piece == "…":
            parts.append(".*?")
        elif re.fullmatch(UUID, piece):
            parts.append(f"({UUID})")
        elif re.fullmatch(TIMESTAMP, piece):
            parts.append(TIMESTAMP)
        else:
            parts.append(re.escape(piece))
    return re.compile("".join(parts) + r"\s*")


def trimmed(expected):
    while expected and not expected[-1].strip():
        expected = expected[:-1]
    return expected


def line_matches(expected_line, actual_line, ids):
    """Whether the line matches; a UUID shown stands for one actual id throughout a
    file (`ids`, both ways), so an example that shows a hold's id coming back as the
    purchase id checks that it does."""
    m = pattern_of(expected_line).fullmatch(actual_line)
    if not m:
        return False
    shown = re.findall(UUID, expected_line)
    for shown_id, actual_id in zip(shown, m.groups()):
        if ids.setdefault(("shown", shown_id), actual_id) != actual_id or \
                ids.setdefault(("actual", actual_id), shown_id) != shown_id:
            return False
    return True


def matches(expected, actual, ids):
    expected = trimmed(expected)
    if len(expected) != len(actual):
        return False
    trial = dict(ids)
    if all(line_matches(e, a, trial) for e, a in zip(expected, actual)):
        ids.update(trial)
        return True
    return False


def updated(expected, actual):
    """The output to write: where the shape is the same, each line that still
    matches is kept as shown (its `…` and ids stay), the others are this run's."""
    expected = trimmed(expected)
    if len(expected) != len(actual):
        return actual
    return [e if line_matches(e, a, {}) else a for e, a in zip(expected, actual)]


class Server:
    """`boxoffice serve` on LISTEN, started with the variables a block declares."""

    def __init__(self, bin_dir, log):
        self.bin_dir, self.log, self.proc, self.env = bin_dir, log, None, None

    def ensure(self, env):
        if self.proc and self.env == env:
            return
        self.stop()
        if port_taken():
            raise Failure(f"{LISTEN} is taken: stop what listens there, the examples "
                          "talk to a server of their own on it")
        full = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"),
                "BOXOFFICE_LISTEN": LISTEN, "RUST_LOG": "warn", **env}
        self.proc = subprocess.Popen([str(self.bin_dir / "boxoffice"), "serve"],
                                     env=full, stdout=self.log, stderr=self.log)
        self.env = env
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Failure(f"the server exited ({self.proc.returncode}); its log: "
                              f"{self.log.name}")
            try:
                with urllib.request.urlopen(f"http://{LISTEN}/health/ready", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise Failure(f"the server did not become ready in 60 s; its log: {self.log.name}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def port_taken():
    host, port = LISTEN.split(":")
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


class Shell:
    """One bash session per file; each command's output and status come back."""

    def __init__(self, bin_dir, workdir):
        self.workdir = workdir
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}",
               "HOME": os.environ.get("HOME", "/"), "LANG": "C.UTF-8"}
        # Its own process group, so that a command that hangs goes with it.
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc"], cwd=workdir, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        # A pipeline fails when any part of it does: `curl … | jq` with curl failing.
        self.proc.stdin.write("set -o pipefail\n")
        self.n = 0

    def run(self, command):
        self.n += 1
        script = Path(self.workdir, f"cmd{self.n}.sh")
        output = Path(self.workdir, f"out{self.n}")
        script.write_text(command + "\n")
        self.proc.stdin.write(f"source {script} > {output} 2>&1 < /dev/null; "
                              f"echo \"@@done $?\"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                self.kill()
                raise Failure(f"timed out after {COMMAND_TIMEOUT_S} s: {command}")
            line = self.proc.stdout.readline()
            if not line:
                raise Failure(f"the shell exited while running: {command}")
            if line.startswith("@@done "):
                status = int(line.split()[1])
                text = output.read_text(errors="replace")
                return status, [l.rstrip() for l in text.rstrip("\n").split("\n")] if text else []

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()


def run_file(path, server, bin_dir, update):
    lines, blocks = blocks_of(path)
    plans = [(b, *parse_declaration(b)) for b in blocks]
    if not any(kind == "run" for _, kind, _ in plans):
        return 0, 0
    failures, ran = 0, 0
    rewrites = []  # (block, command index, new output lines)
    ids = {}  # the UUIDs shown in this file and the ones this run gave
    with tempfile.TemporaryDirectory() as workdir:
        shell = Shell(bin_dir, workdir)
        try:
            for block, kind, arg in plans:
                if kind == "skip":
                    continue
                server.ensure(arg)
                for n, (command, expected, first) in enumerate(commands_of(block)):
                    ran += 1
                    status, actual = shell.run(command)
                    where = f"{block.where()} (+{first + 1})"
                    if status != 0:
                        failures += 1
                        print(f"FAIL {where}: exit {status}: {command}")
                        print("\n".join(f"     | {l}" for l in actual))
                        continue
                    if expected is None or matches(expected, actual, ids):
                        print(f"ok   {where}: {command.splitlines()[0]}")
                        continue
                    if update:
                        rewrites.append((block, n, updated(expected, actual)))
                        print(f"upd  {where}: {command.splitlines()[0]}")
                        continue
                    failures += 1
                    print(f"FAIL {where}: the output differs: {command}")
                    print("\n".join(f"   - {l}" for l in expected))
                    print("\n".join(f"   + {l}" for l in actual))
        finally:
            shell.close()
    if rewrites:
        write_back(path, lines, rewrites)
    return ran, failures


def write_back(path, lines, rewrites):
    by_block = {}
    for block, n, actual in rewrites:
        by_block.setdefault(id(block), (block, {}))[1][n] = actual
    for block, outputs in sorted(by_block.values(), key=lambda b: -b[0].start):
        body = []
        for n, (command, expected, _) in enumerate(commands_of(block)):
            body += ["$ " + command.split("\n")[0]] + command.split("\n")[1:]
            body += outputs.get(n, expected)
        lines[block.start:block.end] = body
    path.write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin-dir", default=str(ROOT / "target" / "debug"),
                        help="where the built boxoffice and rush are")
    parser.add_argument("--update", action="store_true",
                        help="write the outputs of this run into the files")
    parser.add_argument("files", nargs="*", help="default: README.md and docs/*.md")
    args = parser.parse_args()
    bin_dir = Path(args.bin_dir).resolve()
    files = [Path(f).resolve() for f in args.files] or \
        [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    log = tempfile.NamedTemporaryFile("w", prefix="docs-examples-server-", suffix=".log",
                                      delete=False)
    server = Server(bin_dir, log)
    total = failed = 0
    try:
        for path in files:
            ran, failures = run_file(path, server, bin_dir, args.update)
            total, failed = total + ran, failed + failures
    except Failure as e:
        print(f"FAIL {e}")
        failed += 1
    finally:
        server.stop()
    print(f"{total} example commands, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
