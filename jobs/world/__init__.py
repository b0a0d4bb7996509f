"""The synthetic e-commerce world (`relevance generate`): config, vocabulary, generator, writer."""
