"""What works on run folders: one model's protocol, the FLIP pipeline and its recipes, inference,
searches, reports and figures."""
