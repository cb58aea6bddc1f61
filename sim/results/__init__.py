"""Where settled requests go (kept, written, or folded by the tally) and the result they make."""
