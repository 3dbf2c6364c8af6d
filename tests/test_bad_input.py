"""Every kind of bad input gives one clear ``error:`` line naming file, line and field, exit code 2,
no traceback, and nothing written to output_dir."""

import json
import subprocess
import sys

import pytest

from posttrain.cli import main

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _msgs(**change):
    m = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    m[1].update(change)
    return json.dumps({"messages": m})


CASES = {
    "malformed_json": ([json.dumps(GOOD), '{"messages": [', json.dumps(GOOD)], "data.jsonl:2: malformed JSON"),
    "missing_messages": ([json.dumps(GOOD), json.dumps({"text": "x"})], "data.jsonl:2: field 'messages' is missing"),
    "wrong_role": ([json.dumps(GOOD), _msgs(role="bot")],
                   "data.jsonl:2: field 'messages[1].role' must be one of system, user, assistant, tool, got 'bot'"),
    "empty_assistant": ([_msgs(content="  ")], "data.jsonl:1: field 'messages[1].content' is an empty assistant turn"),
    "wrong_type": ([json.dumps(GOOD), _msgs(content=42)], "data.jsonl:2: field 'messages[1].content' must be a string, got int"),
    "messages_not_list": ([json.dumps({"messages": "hi"})], "data.jsonl:1: field 'messages' must be a list of messages"),
    "not_an_object": (["[1, 2]"], "data.jsonl:1: expected a JSON object, got list"),
    "no_assistant": ([json.dumps({"messages": [{"role": "user", "content": "hi"}]})],
                     "data.jsonl:1: field 'messages' has no assistant turn"),
}


def _run(capsys, tmp_path, tiny_model_dir, data_path, extra=()):
    out = tmp_path / "out"
    code = main(["sft", "--config", str(_config(tmp_path, tiny_model_dir, data_path, out)), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err, out


def _config(tmp_path, model, data, out):
    p = tmp_path / "c.yaml"
    p.write_text(f"model: {model}\noutput_dir: {out}\ndatasets:\n  - path: {data}\nmax_steps: 2\n")
    return p


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_records(case, tmp_path, capsys, tiny_model_dir):
    lines, expected = CASES[case]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    code, err, out = _run(capsys, tmp_path, tiny_model_dir, data)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0] and str(data) in err[0], err
    assert not out.exists()


def test_non_utf8(tmp_path, capsys, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    code, err, out = _run(capsys, tmp_path, tiny_model_dir, data)
    assert code == 2 and err == [f"error: {data}:2: not UTF-8 text (byte 17: b'\\xe9')"] and not out.exists()


def test_missing_file_and_bad_key(tmp_path, capsys, tiny_model_dir):
    code, err, out = _run(capsys, tmp_path, tiny_model_dir, tmp_path / "nope.jsonl")
    assert code == 2 and err == [f"error: {tmp_path / 'nope.jsonl'}: file not found"] and not out.exists()
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    code, err, out = _run(capsys, tmp_path, tiny_model_dir, data, ["lerning_rate=1"])
    assert code == 2 and err == ["error: config: unknown key 'lerning_rate'; did you mean 'learning_rate'?"]


def test_console_script_prints_no_traceback(tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + _msgs(role="bot") + "\n")
    out = tmp_path / "out"
    cfg = _config(tmp_path, tiny_model_dir, data, out)
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "sft", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {data}:2: field 'messages[1].role' must be one of system, user, assistant, tool, got 'bot'"
    assert not out.exists()


def test_serve_port_errors_are_one_line_and_exit_2(tiny_model_dir, capsys):
    import socket

    from posttrain.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(tiny_model_dir), "--port", "99999"])
    assert e.value.code == 2 and "argument --port: must be from 0 to 65535, got 99999" in capsys.readouterr().err
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        assert main(["serve", "--model", str(tiny_model_dir), "--port", str(port)]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --host 127.0.0.1 --port {port}: Address already in use"]  # before any model loads


@pytest.mark.parametrize("argv, says", [
    (["eval", "--model", "m", "--limit", "0"], "argument --limit: must be > 0, got 0"),
    (["eval", "--model", "m", "--batch-size", "-4"], "argument --batch-size: must be > 0, got -4"),
    (["tts", "--model", "m", "--task", "gsm8k", "--temperature", "nan"], "argument --temperature: must be a finite number"),
    (["data", "arithmetic", "--digits", "x", "--output", "o"], "argument --digits: not an integer: 'x'"),
    (["data", "decontaminate", "--train", "a", "--against", "b", "--output", "o", "--threshold", "1.5"],
     "argument --threshold: must be a finite number from 0 to 1, got 1.5"),
    (["rag", "--model", "m", "--index", "i", "--k", "0"], "argument --k: must be > 0, got 0"),
    (["serve", "--model", "m", "--timeout-request", "0"], "argument --timeout-request: must be a finite number > 0"),
    (["serve", "--model", "m", "--limit-body-mb", "1e3"], "argument --limit-body-mb: not an integer"),
])
def test_bad_numbers_on_the_command_line_are_one_line_and_exit_2(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and says in err[-1] and "Traceback" not in "\n".join(err)
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("argv, says", [
    (["tts", "--model", "m", "--task", "gsm8k", "--max-thinking=-5"], "error: --max-thinking: every value must be >= 0"),
    (["tts", "--model", "m", "--task", "gsm8k", "--majority", "0"], "error: --majority: every value must be >= 1"),
    (["serve", "--model", "m", "--host", "0.0.0.0"], "error: --host 0.0.0.0: serving beyond this machine needs an API key"),
    (["serve", "--model", "m", "--accept-weights"], "error: --accept-weights needs an API key"),
])
def test_bad_values_found_after_parsing_are_one_line_and_exit_2(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("POSTTRAIN_API_KEY", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(says), err
    assert list(tmp_path.iterdir()) == []
