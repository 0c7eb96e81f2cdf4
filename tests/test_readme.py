"""README.md's examples, run as a user runs them, so that the README cannot rot.

What the README's fenced blocks mean here:
- A ```python block runs in a fresh interpreter; a ```bash block runs in bash (-e, -o pipefail). Both run with
  JAX_PLATFORMS=cpu in a scratch directory that links the checkout's `.venv`, `adapters` and `scripts`, so that the
  README's relative paths work and nothing is written into the checkout.
- A ```text block right after a runnable block is its expected output (stdout), compared with doctest's rules:
  `...` matches anything and runs of whitespace are equal.
- The bash block that runs `jlora serve` starts the server in the background on free ports and its expected output
  is the server's ready line; the examples after it, up to the end of the next section (batch evaluation), talk to
  it with the README's ports 8000 and 50051 replaced by the real ones.
- Blocks in any other language (```sh, ```text alone) are only shown.
"""

from __future__ import annotations

import dataclasses
import doctest
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
RUNNABLE = ("python", "bash")
SERVE = ".venv/bin/jlora serve"
README_PORTS = {"grpc": "50051", "http": "8000"}
# The README sections that must each hold an example that runs.
ENTRY_POINTS = ("Library", "Command line", "Serving", "Batch evaluation", "Training adapters")
TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Block:
    section: str  # the `## ` heading above the block
    lang: str
    code: str
    expected: str | None  # the ```text block right after it, if any
    line: int  # where the block starts in README.md

    @property
    def id(self) -> str:
        return f"{self.section.split()[0].lower()}-line{self.line}"


def parse_readme(text: str) -> list[Block]:
    """Every fenced block with its section, pairing a runnable block with the ```text block that follows it."""
    fence = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
    blocks, section = [], ""
    pos = 0
    raw = []
    for m in fence.finditer(text):
        for h in re.finditer(r"^## (.+)$", text[pos:m.start()], re.M):
            section = h.group(1).strip()
        pos = m.end()
        raw.append((section, m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1, m.start(), m.end()))
    for i, (section, lang, code, line, _, end) in enumerate(raw):
        if lang not in RUNNABLE:
            continue
        expected = None
        if i + 1 < len(raw) and raw[i + 1][1] == "text" and not text[end:raw[i + 1][4]].strip():
            expected = raw[i + 1][2]
        blocks.append(Block(section, lang, code, expected, line))
    return blocks


BLOCKS = parse_readme(open(README, encoding="utf-8").read())


def _serving_group(block: Block) -> bool:
    return block.section in ("Serving", "Batch evaluation")


def check_output(want: str, got: str) -> bool:
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    return doctest.OutputChecker().check_output(want, got, flags)


@dataclasses.dataclass(frozen=True)
class Sandbox:
    cwd: str  # where the README's relative paths (.venv, adapters, scripts) resolve
    env: dict


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    for name in (".venv", "adapters", "scripts"):
        os.symlink(os.path.join(ROOT, name), d / name)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # XLA's default optimization level, as a user has it: scripts/test.sh's level 0 suits the suite's tiny models,
    # whose programs compile for longer than they run, but the default model's steps then ran 1.4x slower in all.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_backend_optimization_level")]
    env["XLA_FLAGS"] = " ".join(flags)
    return Sandbox(str(d), env)


def run_block(block: Block, box: Sandbox, ports: dict[str, str] | None = None) -> str:
    """Runs a block and checks its output against the README; returns stdout."""
    code, expected = block.code, block.expected
    if ports:
        code, expected = _with_ports(code, ports), expected and _with_ports(expected, ports)
    argv = [sys.executable, "-c", code] if block.lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    r = subprocess.run(argv, cwd=box.cwd, env=box.env, capture_output=True, text=True, timeout=TIMEOUT_S)
    where = f"README.md line {block.line}"
    assert r.returncode == 0, f"{where} exited {r.returncode}:\n{r.stdout}\n{r.stderr[-4000:]}"
    if expected is not None:
        assert check_output(expected, r.stdout), f"{where} printed:\n{r.stdout}\nexpected:\n{expected}"
    return r.stdout


def _with_ports(text: str, ports: dict[str, str]) -> str:
    text = re.sub(r"(127\.0\.0\.1|localhost):" + README_PORTS["http"] + r"\b", r"\1:" + ports["http"], text)
    return re.sub(r"(127\.0\.0\.1|localhost):" + README_PORTS["grpc"] + r"\b", r"\1:" + ports["grpc"], text)


def test_parse_pairs_blocks_with_their_output():
    text = ("## One\n```python\nprint(1)\n```\n\n```text\n1\n```\n## Two\n```sh\nshown only\n```\n"
            "```bash\necho hi\n```\nprose in between\n```text\nnot an output\n```\n")
    blocks = parse_readme(text)
    assert [(b.section, b.lang, b.code, b.expected) for b in blocks] == [
        ("One", "python", "print(1)\n", "1\n"), ("Two", "bash", "echo hi\n", None)]
    assert check_output("a ... c\n", "a b b c\n") and not check_output("a ... c\n", "a b b d\n")


def test_every_entry_point_has_a_checked_example():
    for section in ENTRY_POINTS:
        runnable = [b for b in BLOCKS if b.section == section]
        assert runnable, f"README section {section!r} has no python or bash example"
        assert all(b.expected is not None for b in runnable), f"an example in {section!r} has no expected output"
    assert any(b.code.startswith(SERVE) for b in BLOCKS), "the Serving section must start `jlora serve`"
    assert "session" not in open(README, encoding="utf-8").read().lower()


@pytest.mark.parametrize("block", [b for b in BLOCKS if not _serving_group(b)], ids=lambda b: b.id)
def test_example(block, sandbox):
    run_block(block, sandbox)


def test_serving_examples(sandbox):
    group = [b for b in BLOCKS if _serving_group(b)]
    assert group and group[0].code.startswith(SERVE), "the first serving example must start the server"
    proc, ports, log = _start_server(group[0], sandbox)
    try:
        for block in group[1:]:
            run_block(block, sandbox, ports)
    finally:
        proc.send_signal(signal.SIGTERM)  # drains: requests in flight finish, then the server exits
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, "".join(log)[-4000:]
    assert any("jlora serve: stopped" in line for line in log), "".join(log)[-4000:]


def _start_server(block: Block, box: Sandbox):
    command = block.code.replace("\\\n", " ").strip()
    proc = subprocess.Popen(["bash", "-c", f"exec {command} --grpc-port 0 --http-port 0"], cwd=box.cwd, env=box.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = []
    for line in proc.stderr:
        log.append(line)
        m = re.search(r"gRPC [\d.]+:(\d+), HTTP http://[\d.]+:(\d+)", line)
        if m:
            ports = {"grpc": m.group(1), "http": m.group(2)}
            assert check_output(_with_ports(block.expected, ports), line), (line, block.expected)
            threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
            return proc, ports, log
    proc.wait(30)
    raise AssertionError("jlora serve did not start:\n" + "".join(log)[-4000:])
