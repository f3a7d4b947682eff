"""Datasets: the Broden reader, the ConceptWorld generator, classification datasets."""
