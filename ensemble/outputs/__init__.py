"""What a job leaves for its users: scores, the trained ensemble to predict with,
exports, plots and TensorBoard scalars."""
