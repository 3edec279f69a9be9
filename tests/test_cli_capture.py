"""``mi-crow-store capture``: the command line's capture of a Hugging Face model over a corpus."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hf_models import save_tiny_bert
from mi_crow.store import LocalStore
from mi_crow.store.object_store import ObjectStore

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("target", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_capture_cli_on_a_tiny_model(tmp_path: Path, target: str, request: pytest.FixtureRequest) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if target == "local":
        where = str(tmp_path / "s")
        store: Any = LocalStore(tmp_path / "s")
    else:  # the endpoint and credentials from the standard AWS_* variables, as on a cluster
        server = request.getfixturevalue("seaweedfs")
        where = f"s3://{server.new_bucket()}/activations"
        env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
        env.update(server.env(), NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        store = ObjectStore(where, config=server.store_config(), client_options=server.client_options())
    save_tiny_bert(tmp_path / "model")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"text number {i}" for i in range(7)) + "\n\n")
    args = [
        sys.executable,
        "-m",
        "mi_crow.store",
        "capture",
        "--model",
        str(tmp_path / "model"),
        "--layers",
        "encoder.layer.1",
        "--texts",
        str(texts),
        "--run",
        "cli",
        "--store",
        where,
        "--batch-size",
        "3",
        "--max-length",
        "8",
        "--dtype",
        "bf16",
    ]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "captured run 'cli': 3 batch(es), 21 tokens, 1 layer(s)" in proc.stdout
    assert "read back encoder.layer.1: 21 token rows of 32  ok" in proc.stdout
    assert store.list_run_batches("cli") == [0, 1, 2]
    again = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    assert again.returncode == 0 and "0 text(s) left" in again.stdout
    assert store.list_run_batches("cli") == [0, 1, 2]
    bad = subprocess.run(
        [*args[:7], "encoder.layer.7", *args[8:]], capture_output=True, text=True, env=env, check=False
    )
    assert bad.returncode == 2 and "layer 'encoder.layer.7' is not a module of BertModel" in bad.stderr


def test_capture_into_an_unsupported_url_is_refused(tmp_path: Path) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("hello\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mi_crow.store", "capture", "--model", str(tmp_path / "no-model"), "--layers", "a",
         "--texts", str(texts), "--run", "r", "--store", "gs://bucket/x"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "no store serves the URL scheme 'gs'" in proc.stderr
