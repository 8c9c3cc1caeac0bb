"""The coordinator's side: the tether bank and compatibility, the policies that decide
merges and drifts (gravity's galaxies among them), their targets, and the coordinator
that records every decision. It never imports the runtime (Ray)."""
