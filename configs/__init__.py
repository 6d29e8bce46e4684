"""The shipped run configs and DeepSpeed recipes, installed as ``llava_loop.configs`` (see pyproject.toml)."""
