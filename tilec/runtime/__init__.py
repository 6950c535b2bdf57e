"""Runtime: engine files, executors and the generation loop. Never imports the compiler."""
