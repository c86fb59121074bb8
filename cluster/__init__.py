"""Everything that crosses a machine boundary: node registry, control channel, pipeline.

Today only `registry` (typed node data) and `local_node` (the master as a node) exist;
workers fill the same registry in the cluster milestone."""
