"""Drop-in names for code written against other LoRA serving libraries."""
