"""Quality gates: perplexity and RAGAS of a candidate adapter against the champion."""
