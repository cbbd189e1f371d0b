"""Files copied into exported Hugging Face folders (`python -m launcher.export_hf`); each imports only
torch and transformers, so an exported model loads without this project installed."""
