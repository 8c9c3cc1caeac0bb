"""The data layer: datasets (bundled, generated, text and user files), how members'
rows are partitioned, and the groups whose data differ (shifts)."""
