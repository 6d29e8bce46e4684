"""Model folders whose JSON files name Python of their own (``auto_map``): llava_loop never runs it and never asks
whether to. Every place a model, config, tokenizer or processor is loaded either loads transformers' own class or
refuses the folder with a message naming it, the classes and the way out; the folder's code never runs (it would
leave a marker file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llava_loop.cli import main

import helpers

CODE = """open({marker!r}, "w").write("the folder's code ran")
from transformers import PretrainedConfig
class CustomConfig(PretrainedConfig):
    model_type = "my_custom_vlm"
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_dir):
    """A folder of an architecture only its own code defines, and tiny towers and a tiny model whose tokenizer,
    image processor or processor is mapped to code of the folder's own."""
    from llava_loop.demo.tiny import TinySpec, make_tiny_towers

    root = tmp_path_factory.mktemp("remote-code")
    marker = root / "RAN"
    custom = root / "custom"
    custom.mkdir()
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModel": "modeling_custom.CustomModel"}
    (custom / "config.json").write_text(json.dumps({"model_type": "my_custom_vlm", "auto_map": auto_map}))
    for name in ("configuration_custom", "modeling_custom", "tokenization_custom", "processing_custom"):
        (custom / f"{name}.py").write_text(CODE.format(marker=str(marker)))
    vision, llm = make_tiny_towers(root / "towers", TinySpec())

    def mapped(src: Path, name: str, file: str, **fields) -> Path:
        dst = root / name
        shutil.copytree(src, dst)
        for code in custom.glob("*.py"):
            shutil.copy(code, dst)
        data = json.loads((dst / file).read_text())
        (dst / file).write_text(json.dumps({**data, **fields}))
        return dst

    return {
        "marker": marker,
        "custom": custom,
        "vision": vision,
        "llm": llm,
        "tokenizer": mapped(
            llm,
            "llm-tokenizer",
            "tokenizer_config.json",
            tokenizer_class="CustomTokenizer",
            auto_map={"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]},
        ),
        "image_processor": mapped(
            vision,
            "vision-processor",
            "preprocessor_config.json",
            image_processor_type="CustomImageProcessor",
            auto_map={"AutoImageProcessor": "processing_custom.CustomImageProcessor"},
        ),
        "processor": mapped(
            tiny_model_dir,
            "model-processor",
            "processor_config.json",
            processor_class="CustomProcessor",
            auto_map={"AutoProcessor": "processing_custom.CustomProcessor"},
        ),
        "native": mapped(
            tiny_model_dir, "model-native", "config.json", auto_map={"AutoConfig": "configuration_custom.X"}
        ),
    }


def _refused(capsys, argv, *names):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "llava_loop never runs" in err and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)


def test_every_load_site_refuses_a_folder_that_needs_its_own_code(folders, tmp_path, capsys, run_config):
    custom, marker = folders["custom"], folders["marker"]
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(image)
    build = ["build", "--out", str(tmp_path / "built")]
    _refused(
        capsys, [*build, "--vision", str(custom), "--llm", str(folders["llm"])], "--vision", "configuration_custom"
    )
    _refused(capsys, [*build, "--vision", str(folders["vision"]), "--llm", str(custom)], "--llm", "AutoConfig")
    _refused(
        capsys,
        [*build, "--vision", str(folders["image_processor"]), "--llm", str(folders["llm"])],
        "--vision",
        "AutoImageProcessor -> processing_custom.CustomImageProcessor",
    )
    _refused(capsys, ["infer", "--model", str(custom), "--image", str(image), "--prompt", "hi"], "model.path")
    _refused(capsys, ["infer", "--model", str(folders["processor"]), "--image", str(image)], "AutoProcessor")
    _refused(capsys, ["data", "check", "--data", str(tmp_path), "--model", str(custom)], "--model")
    for model in (custom, folders["processor"]):  # training (and export and eval: the same loader)
        run = helpers.launch(run_config(model=model), check=False)
        assert run.returncode == 2 and "llava_loop never runs" in run.stderr and "Traceback" not in run.stderr
    assert main(["build", "--from", str(custom), "--out", str(tmp_path / "up")]) == 2
    assert "a my_custom_vlm model" in capsys.readouterr().err
    assert not marker.exists()


def test_a_folder_of_a_known_architecture_loads_without_its_code(folders, tmp_path):
    """auto_map beside a model_type transformers has (many hub folders carry one): transformers' own class loads it,
    and a tokenizer mapped to code of its own falls back to its tokenizer.json; the folder's code never runs."""
    from llava_loop.build import build_llava
    from llava_loop.runtime import load_model

    model, processor = load_model(folders["native"])
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    built, _, _ = build_llava(str(folders["vision"]), str(folders["tokenizer"]), out=tmp_path / "built")
    assert "auto_map" not in json.loads((tmp_path / "built" / "config.json").read_text())
    assert not folders["marker"].exists()
