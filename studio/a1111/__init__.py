"""AUTOMATIC1111's formats, as its users write and read them: prompt syntax, sampler names, PNG parameters."""
