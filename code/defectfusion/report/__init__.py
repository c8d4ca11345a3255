"""Tables, figures, provenance and the thesis book, from the files the stages wrote."""
