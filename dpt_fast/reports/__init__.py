"""`dpt-fast report`: the runs' summary (summary), the paper's tables (tables), the
accuracy-vs-shots figure (plot) and the command (command)."""
