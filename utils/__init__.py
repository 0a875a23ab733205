"""The toolkit's libraries, grouped by concern into sub-packages (README "Layout"); the stage scripts at the top level
use them. Importing `utils` imports nothing else."""
