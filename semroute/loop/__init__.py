"""Closing the loop: the decision log, feedback on decisions, and learning from them."""
