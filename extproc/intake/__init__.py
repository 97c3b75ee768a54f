"""What a request brings before any tenant logic: its id, its path, its body's encoding and
size (worker process)."""
