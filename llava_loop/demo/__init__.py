"""The built-in demo: tiny towers, synthetic shapes, the demo pipeline, report.png and the shapes scorer.

Nothing outside this package imports it: the core runs without it. It plugs into the core the
way a user's own project would: a ``setup:`` entry in its config (``fixtures.prepare``), an extra scorer
for evaluation (``shapes.attribute_accuracy``) and CLI commands registered through the ``llava_loop.cli``
entry point (``commands.register``).
"""
