import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsv2.generate import generate

from .conftest import model_with_tokenizer


def dsv2(*args, stdin=None):
    proc = subprocess.run([sys.executable, "-m", "dsv2.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)
    return proc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return model_with_tokenizer(tmp_path_factory.mktemp("model"), seed=21)


@pytest.mark.parametrize("name, total, active", [("deepseek-v2", 236, 21), ("deepseek-v2-lite", 15.7, 2.4)])
def test_info_preset_reports_paper_sizes(name, total, active):
    proc = dsv2("info", "--preset", name)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["parameters"]["total_billions"] == pytest.approx(total, rel=0.01)
    assert info["parameters"]["activated_billions"] == pytest.approx(active, rel=0.03)
    kv = info["kv_cache_per_token"]
    layers = 60 if name == "deepseek-v2" else 27
    assert kv["mla"]["elements"] == 576 * layers and kv["mla"]["bytes_bf16"] == 2 * 576 * layers


def test_info_model_dir(model_dir):
    path, model, _ = model_dir
    info = json.loads(dsv2("info", "--model", str(path)).stdout)
    assert info["parameters"]["total"] == sum(p.numel() for p in model.parameters())


def test_generate_streams_the_reference_tokens(model_dir):
    path, model, tok = model_dir
    proc = dsv2("generate", "--model", str(path), "To be, or", "--max-new-tokens", "12", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    ids = tok.encode("To be, or", add_bos=True)
    new = generate(model, [ids], 12, stop_token_ids=[tok.eos_token_id])[0]
    assert proc.stdout == "To be, or" + tok.decode(new, skip_special_tokens=True) + "\n"


def test_chat_keeps_the_conversation(model_dir):
    path, model, tok = model_dir
    proc = dsv2("chat", "--model", str(path), "--max-new-tokens", "6", "--device", "cpu",
                stdin="hello there\nand the fox?\n")
    assert proc.returncode == 0, proc.stderr
    messages, expected = [], ""
    for turn in ("hello there", "and the fox?"):
        messages.append({"role": "user", "content": turn})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        reply = tok.decode(generate(model, [ids], 6, stop_token_ids=[tok.eos_token_id])[0],
                           skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply.strip()})
        expected += reply + "\n"
    assert proc.stdout == expected


def test_cli_errors_are_clear(tmp_path):
    proc = dsv2("generate", "--model", str(tmp_path / "nope"), "hi")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "config.json").write_text("{}")
    proc = dsv2("info", "--model", str(tmp_path))
    assert proc.returncode == 1 and "missing required field" in proc.stderr
    proc = dsv2("generate", "--max-new-tokens", "-5", "hi")
    assert proc.returncode == 2 and "--max-new-tokens: must be a positive integer, got '-5'" in proc.stderr


def test_no_module_imports_the_cli_back():
    """The command imports every subcommand's module; none of them imports the command (the bundled
    model's place is dsv2/resources.py)."""
    import ast

    package = Path(__file__).resolve().parents[1] / "dsv2"
    for path in package.rglob("*.py"):
        if path.name in ("cli.py", "__main__.py") and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                target = "." * node.level + module
                assert target not in ("..cli", "dsv2.cli") and not (node.level == 1 and module == "cli"
                                                                     and path.parent == package), path


def test_bundled_model_is_the_default():
    proc = dsv2("generate", "ROMEO. O gentle night,", "--max-new-tokens", "8", "--device", "cpu", "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ROMEO. O gentle night,") and len(proc.stdout) > len("ROMEO. O gentle night,") + 5
    proc = dsv2("chat", "--max-new-tokens", "4", "--device", "cpu", stdin="hello\n")
    assert proc.returncode == 0, proc.stderr


def test_bundled_model_size_limits():
    from dsv2.cli import bundled_model_dir

    weights = list(bundled_model_dir().glob("*.safetensors"))
    assert weights and all(p.stat().st_size <= 16 * 2**20 for p in weights)
    assert sum(p.stat().st_size for p in bundled_model_dir().iterdir()) <= 40 * 2**20
    info = json.loads(dsv2("info", "--model", str(bundled_model_dir())).stdout)
    assert info["routed_experts"] == 16 and info["shared_experts"] == 1
