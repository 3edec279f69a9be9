"""The documentation site: built strictly, its API pages carry every member of the reference text,
and it renders (members, search) in a real headless browser."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The reference API page this package implements (an mkdocs-material + mkdocstrings page, as text),
# copied from ../shared/seed/store_api_reference.txt so that a fresh clone has it.
REFERENCE = ROOT / "tests" / "fixtures" / "store_api_reference.txt"
MKDOCS = Path(sys.executable).with_name("mkdocs")


@dataclass
class Member:
    """One entry of the reference text: its signature, parameter table, returns and raises."""

    name: str
    signature: list[str] = field(default_factory=list)
    params: list[tuple[str, str]] = field(default_factory=list)
    returns: list[str] = field(default_factory=list)
    raises: list[str] = field(default_factory=list)


def _table_rows(lines: list[str], i: int, columns: int) -> tuple[list[list[str]], int]:
    """Rows of a reference table whose header ends at line i; each cell ends with a line '|'."""
    rows: list[list[str]] = []
    while (
        i < len(lines)
        and lines[i] not in ("Parameters:", "Returns:", "Raises:")
        and not lines[i].startswith(("Source code in", "Note"))
    ):
        row: list[str] = []
        cell: list[str] = []
        while i < len(lines) and len(row) < columns:
            line = lines[i]
            i += 1
            if line == "|":
                row.append(" ".join(cell))
                cell = []
            elif line.endswith(" |") or line.endswith("|"):
                row.append(" ".join([*cell, line.rstrip("|").strip()]))
                cell = []
            else:
                cell.append(line)
        rows.append(row)
    return rows, i


def parse_reference(text: str) -> dict[str, list[Member]]:
    """{class name: its members} as the reference page lists them (the class itself is `__init__`)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    classes: dict[str, list[Member]] = {}
    current: list[Member] | None = None
    member: Member | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = re.fullmatch(r"(\w+) ¶", line)
        abstract = i + 2 < len(lines) and lines[i + 1] == "abstractmethod" and lines[i + 2] == "¶"
        if heading and heading.group(1) in ("LocalStore", "Store"):
            current = classes.setdefault(heading.group(1), [])
            member = Member("__init__")
            current.append(member)
            i += 1
        elif current is not None and (heading or (re.fullmatch(r"\w+", line) and abstract)):
            member = Member(heading.group(1) if heading else line)
            current.append(member)
            i += 1 if heading else 3
        elif member is not None and not member.signature and line.endswith(("(", ")")) and "(" in line:
            sig = [line]
            while not sig[-1].endswith(")"):
                i += 1
                sig.append(lines[i])
            inner = " ".join(sig).split("(", 1)[1].rsplit(")", 1)[0]
            member.signature = [p.strip().split("=")[0] for p in inner.split(",") if p.strip() and p.strip() != "*"]
            i += 1
        elif member is not None and line in ("Parameters:", "Returns:", "Raises:"):
            columns = {"Parameters:": 4, "Returns:": 2, "Raises:": 2}[line]
            rows, i = _table_rows(lines, i + 3, columns)  # past the title, the header row and the rule
            if line == "Parameters:":
                member.params = [(r[0], r[1]) for r in rows]
            elif line == "Returns:":
                member.returns = [r[0] for r in rows]
            else:
                member.raises = [r[0] for r in rows]
        else:
            i += 1
    return classes


def _text(fragment: str) -> str:
    text = html.unescape(re.sub(r"<[^>]+>", " ", fragment))
    return " ".join(text.replace("\u2011", "-").split())


def _squeeze(text: str) -> str:
    return "".join(text.split())


def page_members(page: str, cls: str) -> dict[str, str]:
    """{member name: the text of its section} of a built API page ('__init__' is the class heading)."""
    source = page
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'<h\d id="(mi_crow\.store\.[\w.]+)"', source)]
    out: dict[str, str] = {}
    for k, (start, ident) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(source)
        if ident == f"mi_crow.store.{cls}":
            # the class's own section: up to its first member
            out["__init__"] = _text(source[start:end])
        elif ident.startswith(f"mi_crow.store.{cls}."):
            out[ident.rsplit(".", 1)[1]] = _text(source[start:end])
    return out


@pytest.fixture(scope="module")
def site() -> Iterator[Path]:
    if not MKDOCS.exists():
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "site"
        proc = subprocess.run(
            [str(MKDOCS), "build", "--strict", "--site-dir", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield out


def test_reference_text_parses() -> None:
    if not REFERENCE.exists():
        pytest.skip(f"the reference text is not at {REFERENCE}")
    classes = parse_reference(REFERENCE.read_text("utf-8"))
    names = {m.name for m in classes["Store"]}
    assert {"put_detector_metadata", "get_detector_metadata", "iter_run_batch_range", "put_run_metadata"} <= names
    put = next(m for m in classes["Store"] if m.name == "put_detector_metadata")
    assert put.signature == ["run_id", "batch_index", "metadata", "tensor_metadata"]
    assert [p for p, _ in put.params] == put.signature and put.returns and put.raises


@pytest.mark.parametrize("cls", ["Store", "LocalStore"])
def test_api_pages_carry_every_member_of_the_reference(site: Path, cls: str) -> None:
    if not REFERENCE.exists():
        pytest.skip(f"the reference text is not at {REFERENCE}")
    reference = parse_reference(REFERENCE.read_text("utf-8"))
    page = (site / "api" / {"Store": "store", "LocalStore": "local_store"}[cls] / "index.html").read_text("utf-8")
    built = page_members(page, cls)
    # LocalStore's page carries the Store members the reference documents, inherited.
    wanted = reference["Store"] if cls == "LocalStore" else reference[cls]
    wanted = [m for m in wanted if m.name != "__init__"] + [m for m in reference[cls] if m.name == "__init__"]
    missing = [m.name for m in wanted if m.name not in built]
    assert not missing, f"{cls} page lacks {missing}"
    problems = []
    for m in wanted:
        text = built[m.name]
        name = cls if m.name == "__init__" else m.name
        sig = re.search(re.escape(name) + r" \((.*?)\)", text)
        got = [p.strip().split("=")[0].strip() for p in sig.group(1).split(",")] if sig else None
        got = [p for p in got if p and p != "*"] if got is not None else None
        # A backend may add keyword options after the reference's parameters (LocalStore's durable=...).
        if got is None or got[: len(m.signature)] != m.signature:
            problems.append(f"{m.name}: signature {got} != {m.signature}")
        # Types are compared without spaces: the page sets "Dict[str, Any]" as linked parts.
        table = _squeeze(text.split("Parameters:", 1)[1]) if "Parameters:" in text else ""
        for pname, ptype in m.params:
            if _squeeze(f"{pname} {ptype}") not in table:
                problems.append(f"{m.name}: parameter row {pname} {ptype} not on the page")
        returns = _squeeze(text.split("Returns:", 1)[1]) if "Returns:" in text else ""
        for rtype in m.returns:
            if _squeeze(rtype) not in returns:
                problems.append(f"{m.name}: returns {rtype} not on the page")
        raises = text.split("Raises:", 1)[1] if "Raises:" in text else ""
        for etype in m.raises:
            if not re.search(r"\b" + re.escape(etype) + r"\b", raises):
                problems.append(f"{m.name}: raises {etype} not on the page")
    assert not problems, "\n".join(problems)


PUBLIC = {
    "api/store": ["Store", "TensorMetadata"],
    "api/local_store": ["LocalStore", "GcReport"],
    "api/memory_store": ["MemoryStore"],
    "api/object_store": ["ObjectStore", "ObjectStoreError", "open_store", "Capabilities"],
    "api/layout_store": ["LayoutStore", "Problem"],
    "api/capture": ["ActivationCapture"],
    "api/corpus": ["capture_corpus", "CorpusReport", "CaptureSetupError", "read_texts", "pack_tokens"],
    "api/stats": ["LayerStats", "read_stats", "disable_progress_bars", "enable_progress_bars"],
    "api/activation_dataset": ["ActivationDataset", "ActivationLoader"],
    "api/store_dataloader": ["StoreDataloader"],
    "api/copy": ["copy_store", "CopyReport"],
    "api/errors": [
        f"errors.{e}" for e in ("StoreError", "CorruptFileError", "CorruptMetadataError", "InvalidJSONError")
    ],
    "api/testing": ["testing.StoreTests", "testing.BackendTests", "testing.StoreStateMachine"],
}


def test_every_public_name_has_an_api_page(site: Path) -> None:
    import mi_crow.store

    documented = {name.rsplit(".", 1)[-1] for names in PUBLIC.values() for name in names}
    assert set(mi_crow.store.__all__) - {"__version__"} <= documented
    for page, names in PUBLIC.items():
        text = (site / page / "index.html").read_text("utf-8")
        for name in names:
            assert f'id="mi_crow.store.{name}"' in text, f"{page} lacks {name}"


def test_cli_reference_lists_every_command(site: Path) -> None:
    from mi_crow.store.cli import main

    text = _text((site / "cli" / "index.html").read_text("utf-8"))
    for name in main.commands:  # type: ignore[attr-defined]
        assert f"mi-crow-store {name}" in text


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _dump_dom(browser: str, url: str, profile: Path) -> str:
    proc = subprocess.run(
        [browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class _WebSocket:
    """The least of a WebSocket client (RFC 6455 text frames) that the DevTools protocol needs."""

    def __init__(self, url: str):
        hostport, path = url.split("://", 1)[1].split("/", 1)
        host, port = hostport.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self._exactly(1)
        assert b" 101 " in head.split(b"\r\n", 1)[0], head

    def _exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the browser closed the DevTools connection")
            buf += chunk
        return buf

    def send(self, text: str) -> None:
        data, mask, n = text.encode(), os.urandom(4), len(text.encode())
        if n < 126:
            head = bytes([0x81, 0x80 | n])
        elif n < 65536:
            head = bytes([0x81, 0x80 | 126]) + struct.pack(">H", n)
        else:
            head = bytes([0x81, 0x80 | 127]) + struct.pack(">Q", n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._exactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exactly(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exactly(8))[0]
            message += self._exactly(n)
            if b0 & 0x80:
                return message.decode()

    def close(self) -> None:
        self.sock.close()


# Waits (up to 30 s of real time) for mkdocs-material's search, which runs in a web worker, to list results.
SEARCH_RESULTS_JS = """new Promise(resolve => { const t0 = Date.now(); (function poll() {
  const items = document.querySelectorAll('.md-search-result__item');
  if (items.length || Date.now() - t0 > 30000) resolve(JSON.stringify({
    meta: (document.querySelector('.md-search-result__meta') || {}).textContent || '',
    texts: Array.from(items).map(e => e.textContent.trim().slice(0, 300)),
    hrefs: Array.from(document.querySelectorAll('.md-search-result__item a')).map(a => a.href)}));
  else setTimeout(poll, 100); })(); })"""


def _search_results(browser: str, url: str, profile: Path) -> dict[str, Any]:
    """Opens url in headless Chromium and reads the search results off the page, over DevTools."""
    proc = subprocess.Popen(
        [browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=30) as r:
            targets = json.load(r)
        ws = _WebSocket(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        try:
            counter = iter(range(1, 1_000_000))

            def call(method: str, **params: Any) -> dict[str, Any]:
                i = next(counter)
                ws.send(json.dumps({"id": i, "method": method, "params": params}))
                while True:
                    msg: dict[str, Any] = json.loads(ws.recv())
                    if msg.get("id") == i:
                        assert "error" not in msg, msg
                        return msg

            call("Page.enable")
            call("Page.navigate", url=url)
            for _ in range(100):  # until the new document's scripts have run
                state = call("Runtime.evaluate", expression="document.readyState + ' ' + location.href")
                if state["result"]["result"].get("value", "").startswith("complete http"):
                    break
                time.sleep(0.1)
            r = call("Runtime.evaluate", expression=SEARCH_RESULTS_JS, awaitPromise=True, returnByValue=True)
            result: dict[str, Any] = json.loads(r["result"]["result"]["value"])
            return result
        finally:
            ws.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_api_page_and_search_render_in_headless_chromium(served: str, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    dom = _dump_dom(browser, f"{served}/api/store/", tmp_path / "profile-api")
    for name in ("put_detector_metadata", "get_detector_metadata_by_layer_by_key", "iter_run_batch_range"):
        assert f'id="mi_crow.store.Store.{name}"' in dom
    found = _search_results(browser, f"{served}/?q=put_detector_metadata", tmp_path / "profile-search")
    assert found["texts"], f"search found nothing for put_detector_metadata ({found['meta']!r})"
    assert any("put_detector_metadata" in t for t in found["texts"]), found
    assert any("/api/store/" in h for h in found["hrefs"]), found
