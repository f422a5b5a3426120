"""The administrator's commands: the CLI, `cmlab init`, the demo, the lab cloud and the
sample builder, CMUpdateReset. The top layer: it may import everything, nothing imports it."""
