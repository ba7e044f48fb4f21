"""Layer 5: batch inference: score a file of chats with a logged model, in pandas or on Spark."""
