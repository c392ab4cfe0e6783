"""The release: bundle, cards, data card, SBOM and publishing to the Hub."""
