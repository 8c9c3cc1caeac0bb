"""Running a job: checking and preparing it, one process or Ray (the coordinator actor,
worker actors, placement, clusters, job submission), run directories and trust."""
