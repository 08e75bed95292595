"""The Hugging Face Hub as a destination: pushing steps (``push``) and continuing a published one (``resume``)."""
