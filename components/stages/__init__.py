"""One runner per stage: its config section and explicit inputs in, its outputs out.

The CLI, the Prefect tasks, `dvc.yaml` and the toy reproduction call these runners and
nothing else wires the components together.
"""
