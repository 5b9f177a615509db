"""`loraswap train` end to end on the tiny base, and `--publish` against the upload API's contract."""

from __future__ import annotations

import json

import httpx
import pytest

from adapters.format import CONFIG_FILE, PROVENANCE_FILE, WEIGHTS_FILE
from trainer.cli import main
from trainer.publish import PublishError, publish


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base_dir):
    """One CLI run on the tiny base (shared by the tests below)."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "train.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"prompt": f"Count to {n}", "completion": " ".join(map(str, range(1, n + 1)))})
            for n in range(2, 8)
        )
        + "\n"
    )
    out = root / "adapter"
    code = main(
        [
            "--data",
            str(data),
            "--out",
            str(out),
            "--base",
            str(tiny_base_dir),
            "--rank",
            "2",
            "--alpha",
            "4",
            "--target-modules",
            "q_proj,v_proj",
            "--epochs",
            "1",
            "--batch-size",
            "3",
            "--max-length",
            "64",
            "--eval-data",
            str(data),
            "--no-progress",
        ]
    )
    assert code == 0
    return out


def test_cli_writes_a_peft_adapter_with_provenance(trained):
    assert {p.name for p in trained.iterdir()} >= {CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE, "loss_curve.png"}
    config = json.loads((trained / CONFIG_FILE).read_text())
    assert config["r"] == 2 and config["target_modules"] == ["q_proj", "v_proj"]
    metrics = json.loads((trained / PROVENANCE_FILE).read_text())["metrics"]
    assert metrics["eval_loss"] > 0 and metrics["tokens_seen"] > 0


def test_cli_reports_bad_data_with_line_numbers(tmp_path, tiny_base_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    code = main(["--data", str(data), "--out", str(tmp_path / "o"), "--base", str(tiny_base_dir), "--no-progress"])
    assert code == 2
    assert "line 2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--publish", "http://x"], "--publish needs --name"),
        (["--target-modules", "q_proj,embed"], "embed"),
        (["--rank", "0"], "rank"),
    ],
)
def test_cli_rejects_bad_flags(tmp_path, argv, message, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(SystemExit) as info:
        main(["--data", str(data), "--out", str(tmp_path / "o"), *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def _server(status: int, body: dict, seen: list):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handler)


def test_publish_uploads_name_and_files_as_multipart_with_the_key(trained):
    seen: list[httpx.Request] = []
    card = {"id": "a1", "object": "adapter", "name": "counter", "version": 1, "sha256": "0" * 64}
    answer = publish(trained, "http://server:8000/", "counter", api_key="k-123", transport=_server(201, card, seen))
    assert answer == card
    request = seen[0]
    assert request.method == "POST" and str(request.url) == "http://server:8000/v1/adapters"
    assert request.headers["authorization"] == "Bearer k-123"
    body = request.read()
    assert b'name="name"\r\n\r\ncounter' in body
    for name in (CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE):
        assert f'name="files"; filename="{name}"'.encode() in body
        assert (trained / name).read_bytes() in body
    assert b"loss_curve.png" not in body


def test_publish_failure_says_why(trained, tmp_path):
    envelope = {
        "error": {
            "message": "adapter was trained with chat template abc",
            "type": "invalid_request_error",
            "param": "files",
            "code": "template_mismatch",
        }
    }
    with pytest.raises(PublishError, match="422: adapter was trained with chat template abc \\(template_mismatch\\)"):
        publish(trained, "http://server", "x", transport=_server(422, envelope, []))
    with pytest.raises(PublishError, match="lacks adapter_model.safetensors"):
        (tmp_path / CONFIG_FILE).write_text("{}")
        publish(tmp_path, "http://server", "x", transport=_server(201, {}, []))


def test_cli_publish_to_an_unreachable_server_exits_non_zero(trained, tmp_path, tiny_base_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    code = main(
        [
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
            "--base",
            str(tiny_base_dir),
            "--epochs",
            "1",
            "--rank",
            "2",
            "--no-progress",
            "--publish",
            "http://127.0.0.1:9",
            "--name",
            "x",
        ]
    )
    assert code == 1
    assert "publish failed: could not reach http://127.0.0.1:9/v1/adapters" in capsys.readouterr().err
    assert (tmp_path / "o" / WEIGHTS_FILE).is_file()  # the adapter stays on disk for a retry
