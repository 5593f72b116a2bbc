"""The paper's small-model tasks: Reddit, knowledge-grounded dialogue (WoW / FaithDial), COMET."""
