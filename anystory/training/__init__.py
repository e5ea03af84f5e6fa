"""Training AnyStory in two stages (and the miniature's base model before them); see ``__main__.py``."""
