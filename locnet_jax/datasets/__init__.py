"""Builders of data sets in the DATA_FORMAT.md form (`dataset.json` + NIfTI + Slicer landmark files)."""
