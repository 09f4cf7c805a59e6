"""Raw-format readers, the prepared-dataset file, splits, label sampling and image datasets."""
