"""The data stage: corpus generation, importers, tokenizer, packing and the data order."""
