"""Everything that crosses a machine boundary: node registry, control channel, pipeline.

`registry` holds typed node data (NodeInfo / NodeState) that feeds the status page and the
planner; `local_node` describes the master itself as a node of that registry."""
