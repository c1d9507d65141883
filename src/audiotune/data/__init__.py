"""Source formats, audio decoding and the Dataset schema."""
