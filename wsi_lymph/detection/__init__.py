"""The method on arrays: hematoxylin mask, block inference kernel, peaks (one blockwise driver), evaluation."""
