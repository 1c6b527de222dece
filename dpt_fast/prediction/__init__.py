"""`dpt-fast predict`: a checkpoint's predictions on image files (predict) and their output
formats (predictions)."""
