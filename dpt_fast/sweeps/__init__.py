"""`dpt-fast sweep`: a grid of training runs as data (plan), run in one session (runner), and
its command line (command)."""
