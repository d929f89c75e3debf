-- A dead letter about a Kafka record is identified by who refused it and where
-- the record was: a service that crashed after publishing its letters and
-- before storing its position publishes them again, and the table keeps one.
-- Letters without coordinates (a producer's parse rejects) are all kept
-- (NULLs are distinct in a unique index).
DELETE FROM dead_letters a
 USING dead_letters b
 WHERE a.component = b.component
   AND a.topic = b.topic
   AND a.partition = b.partition
   AND a."offset" = b."offset"
   AND a.id > b.id;
CREATE UNIQUE INDEX dead_letters_identity ON dead_letters (component, topic, partition, "offset");
