variable "project" {
  description = "Google Cloud project that holds the dataset."
  type        = string
}

variable "location" {
  description = "Location of the dataset (US, EU, or a region such as europe-west1)."
  type        = string
  default     = "US"
}

variable "dataset" {
  description = "Dataset of the tables and views; bigquery-sink's --dataset (TICKPIPE_BIGQUERY_DATASET)."
  type        = string
  default     = "tickpipe"
}

variable "deletion_protection" {
  description = "Refuse to destroy tables that hold data."
  type        = bool
  default     = true
}
