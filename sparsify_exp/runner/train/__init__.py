"""Training between sparsifier steps: :mod:`.loop` (masks kept applied while the user's loop
runs), :mod:`.checkpoint` (the job's resumable state), :mod:`.resume` (``resume=<run>``)."""
