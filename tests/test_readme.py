"""The README as a newcomer uses it: every Python block runs as written, its commands parse, its signatures are real.

Each Python block is copied into a fresh directory and run there in a fresh interpreter, offline, exactly as
someone pasting it would. A block that needs weights nobody has offline is preceded by a marker,
`<!-- readme-test: stand-in t5 PLACEHOLDER -->`: a tiny random T5 (with the real T5 tokenizer) is saved in the
block's directory and PLACEHOLDER is replaced by its path. Docs added under docs/ or examples/ are run the same way.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST_COMPILE, SHARED, make_hf_t5

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md")), *sorted((ROOT / "examples").glob("**/*.md"))]
FENCE = re.compile(r"(?:<!--\s*readme-test:\s*(?P<marker>[^>]*?)\s*-->\s*\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)


def blocks(lang: str) -> list:
    """pytest params (marker, code) for every fenced block of `lang`, named file:line."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if m["lang"] == lang:
                line = text[: m.start("code")].count("\n") + 1
                found.append(pytest.param(m["marker"], m["code"], id=f"{doc.relative_to(ROOT)}:{line}"))
    return found


def _stand_in(marker: str, code: str, workdir: Path) -> str:
    kind, placeholder = marker.split()[1:]
    assert marker.startswith("stand-in ") and kind == "t5", f"unknown readme-test marker {marker!r}"
    if not (SHARED / "tokenizers" / "t5").is_dir():
        pytest.skip("the T5 stand-in needs ../shared/tokenizers/t5")
    model = workdir / "stand-in-t5"
    make_hf_t5(model, vocab_size=32128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    for f in (SHARED / "tokenizers" / "t5").iterdir():
        shutil.copy(f, model / f.name)
    assert placeholder in code, f"the marker names {placeholder!r}, which the block does not use"
    return code.replace(placeholder, str(model))


@pytest.mark.parametrize("marker,code", blocks("python"))
def test_python_block_runs_as_written(marker, code, tmp_path):
    if marker:
        code = _stand_in(marker, code, tmp_path)
    (tmp_path / "block.py").write_text(code)
    # A block that sets XLA_FLAGS starts without them, as on a user's machine; the rest compile as the suite does.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "XLA_FLAGS": FAST_COMPILE}
    if "XLA_FLAGS" in code:
        env.pop("XLA_FLAGS")
    proc = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-3000:]  # XLA resharding the hard way


def _commands() -> list:
    found = []
    for param in blocks("bash"):
        _, code = param.values
        for command in code.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            for i, w in enumerate(words):
                if w == "-m" and i + 1 < len(words) and words[i + 1] in ("train.summarize", "train.lab", "train.generate", "train.prefer", "train.grpo"):
                    end = words.index("&&", i) if "&&" in words[i:] else len(words)
                    found.append(pytest.param(words[i + 1], words[i + 2 : end], id=f"{param.id}:{words[i + 1]}"))
    return found


@pytest.mark.parametrize("module,argv", _commands())
def test_cli_commands_parse_and_pass_the_checks(module, argv, monkeypatch):
    """Every `python -m train.summarize|lab|prefer|grpo ...` in a bash block takes its flags and passes the option checks;
    `train.generate`'s take their flags (its checks need the run directories they name). A `--mesh` is for the
    machine the command names (8 GPUs): here it must parse; its device count is that machine's."""
    from jpeft.training import sharding
    from train import generate, grpo, lab, options, prefer, summarize

    monkeypatch.setattr(options, "check_mesh", sharding.parse_mesh)

    if module == "train.generate":
        generate.parse(argv)
    elif module == "train.lab":
        for _, args in lab.plan(lab.parser().parse_args(argv)):
            options.check(args)
    elif module in ("train.prefer", "train.grpo"):
        command = prefer if module == "train.prefer" else grpo
        args = command.parser().parse_args(argv)
        options.check(args)
        command.check(args)
    else:
        options.check(summarize.parser().parse_args(argv))


MODULES = {"llama": "jpeft.models.llama", "gemma": "jpeft.models.gemma", "moe": "jpeft.models.moe", "t5": "jpeft.models.t5"}
ENTRY = re.compile(r"`((?:jpeft|llama|gemma|moe|t5|train)\.[\w.]+)\(([^`]*?)\)")


def _entry_points() -> list:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Main entry points"):]
    section = section[: section.index("\n#", 1)]
    return [pytest.param(name, args, id=name) for name, args in ENTRY.findall(section)]


def _resolve(dotted: str):
    head, *rest = dotted.split(".")
    obj = importlib.import_module(MODULES.get(head, head))
    for part in rest:
        obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(f"{obj.__name__}.{part}")
    return obj


@pytest.mark.parametrize("name,args", _entry_points())
def test_listed_signatures_match_the_code(name, args):
    """The README's parameter names are the function's first parameters, in order; any it leaves out have defaults."""
    listed = [a.split("=")[0].strip().lstrip("*") for a in args.split(",") if a.strip() not in ("", "*")]
    params = list(inspect.signature(_resolve(name)).parameters.values())
    assert [p.name for p in params[: len(listed)]] == listed, f"{name}: README says {listed}, code has {[p.name for p in params]}"
    left_out = [p.name for p in params[len(listed):] if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert not left_out, f"{name}: the README leaves out {left_out}, which have no default"


def test_every_python_block_is_collected():
    assert len(blocks("python")) >= 4 and len(_entry_points()) >= 20 and len(_commands()) >= 3


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_links_lead_somewhere(doc):
    """Every `(#anchor)` names a heading of its document, and every relative link names a file that exists."""
    text = doc.read_text()
    anchors = {_slug(h) for h in re.findall(r"^#{1,4} (.*)$", text, re.M)}
    assert not {a for a in re.findall(r"\]\(#([^)]*)\)", text)} - anchors
    links = [link for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)]
    assert not [link for link in links if not (doc.parent / link).exists()]
