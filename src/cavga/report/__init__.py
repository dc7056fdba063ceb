"""What people look at: per-image output files, the HTML report and the pictures in them."""
