"""What an inspector runs: prediction on images (`predict`) and the export to transformers'
`save_pretrained` and ONNX with its model card (`export`)."""
