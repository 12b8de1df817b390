"""What a running process knows about itself: its rank, the stop signals, the optional stacks."""
